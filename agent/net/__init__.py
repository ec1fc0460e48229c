"""Terminals together: the inter-terminal transport and the etcd ordering."""
