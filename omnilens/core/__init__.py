"""The core every other layer stands on: the hook graph, views, attention hook points, caches, packed
segments, errors, atomic file writes, the shared axis vocabulary and version checks. Imports nothing else
from omnilens."""
