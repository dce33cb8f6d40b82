"""The gRPC retrieval service. Not built yet: see the service issue."""
