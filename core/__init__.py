"""The bottom layer: what every package may import and which imports no other package of ours
(errors users fix, device choice, image arrays, the address guard)."""
