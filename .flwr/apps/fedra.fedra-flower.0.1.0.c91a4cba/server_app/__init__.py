"""Flower ServerApp and the FedRA Strategy."""
