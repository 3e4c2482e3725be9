"""Preprocessing op strings: a registry of TF ops and a builder that parses `op1|op2(args)`."""
