"""The wire contract (drafthorse.v1) and its generated Python stubs; see protos/generate.py."""
