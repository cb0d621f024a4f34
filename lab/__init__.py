"""The test lab: everything that exercises trio-tproxy and is not trio-tproxy.

The sidecar (``trio_tproxy``) never imports this package, and the container
image does not contain it; the tests, the fuzz campaigns, the benchmarks and
``trio-tproxy demo`` (from a clone of the repository) stand on it.

Map, from the bottom up:

``netns``
    Network-namespace helpers: the per-process prefix every lab namespace is
    named under (so one check finds leftovers), an empty scratch namespace,
    sockets created inside a namespace, a plaintext probe client.
``topology``
    :class:`~lab.topology.Topology`: pods as namespaces on one bridge, with
    processes started inside them and a teardown that leaves nothing behind.
``pki``
    :class:`~lab.pki.PKI`: a throwaway CA that writes certificate and key files
    for tests, the pods and the benchmarks.
``apps``
    The stand-in applications (stdlib only, no trio_tproxy): the demo and
    test servers and clients, and the benchmark load generators.
``pods``
    :class:`~lab.pods.PodLab`: a topology, its PKI and ``trio-tproxy run`` in
    each pod; :class:`~lab.pods.Pods`, a connection transport through both
    sidecars for the relay property.
``chain``
    The sidecars' data path without the kernel: loopback TCP and TLS pairs and
    the two-relay chain, for unit tests, the fuzz property and benchmarks.
``require``
    The rule for tests that need what a machine may lack: skip, except under
    CI (``CI=true``), where they fail and say why.
``demo``
    ``trio-tproxy demo``.

Nothing is imported here, so ``python -m lab.apps`` and running ``apps.py`` by
path stay as cheap as a stdlib script.
"""
