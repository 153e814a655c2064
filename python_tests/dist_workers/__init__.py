"""Scripts run under torchrun by the distributed tests, and the launcher the tests use."""
