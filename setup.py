"""Only the optional compiled data path (trio_tproxy/fastpath.py); everything else is in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds and the
sidecar runs its pure-Python data path (``trio-tproxy doctor`` and the start-up
line say which).  The C file includes no Python.h: it is loaded with cffi's
ABI mode, so a compiler and libc headers are all it needs.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "trio_tproxy._fastpath",
            ["trio_tproxy/_fastpath.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        )
    ]
)
