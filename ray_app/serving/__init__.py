"""The Ray Serve app: the labelling and MRI endpoints and their request checks."""
