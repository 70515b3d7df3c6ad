"""Engine adapters: each hands its engine's own tensors to gdn_backend's op."""
