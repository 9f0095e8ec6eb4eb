"""The data path: stage executor, hops, replicas, link emulation, the gRPC stream and node, the edge's request path."""
