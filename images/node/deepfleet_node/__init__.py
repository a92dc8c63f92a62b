"""Code that runs inside deepfleet node containers: detect, train, infer."""
