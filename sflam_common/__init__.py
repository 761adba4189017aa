"""What every sflam package shares and nothing else: the collected-problems error, did-you-mean
hints, the bit widths the wire carries and the installed version.

The bottom layer: it imports only the standard library, and every package may import it
(docs/architecture.md).
"""
