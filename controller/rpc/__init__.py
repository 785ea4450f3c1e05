"""The controller's gRPC side (servicers, wire, servers): the only place on it that imports grpc."""
