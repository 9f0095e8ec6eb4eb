"""The wire between nodes: the protobuf messages, the pure tensor codec, and batch validation. No torch.fx, no model."""
