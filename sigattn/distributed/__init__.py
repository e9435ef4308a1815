"""Context parallelism: sigmoid attention over a sequence sharded across the ranks of a process group.

``ring_sigmoid_attn`` passes key/value shards around a ring of point-to-point sends, overlapped with
compute; ``ulysses_sigmoid_attn`` trades sequence shards for head shards with all-to-alls. Both take this
rank's (B, S_local, H, D) shards and return its output shard, with autograd. ``sharding`` splits a full
sequence into shards (contiguous or zig-zag) and puts them back. README.md compares the two methods.
"""

from .ring import ring_sigmoid_attn
from .sharding import shard_positions, shard_sequence, unshard_sequence
from .ulysses import ulysses_sigmoid_attn

__all__ = [
    "ring_sigmoid_attn",
    "shard_positions",
    "shard_sequence",
    "ulysses_sigmoid_attn",
    "unshard_sequence",
]
