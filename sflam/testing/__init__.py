"""Harnesses that drive the product from outside, as a user or an attacker would: a provisioned
TLS fleet on loopback (:mod:`sflam.testing.local_fleet`) and the hostile-input run
(:mod:`sflam.testing.hostile`). Tests and benchmarks use them; no runtime path imports them."""
