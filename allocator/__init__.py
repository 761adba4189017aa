"""The latency/energy system model and the SFLAM resource allocation (numpy/scipy/cvxpy only)."""
