"""Offline purification of backdoored CLIP models (torch, open_clip)."""
