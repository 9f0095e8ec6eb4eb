"""The data path: stage executor, hops, replicas, link emulation, the framed data plane, the node, the
edge's request path."""
