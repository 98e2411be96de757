"""Reading labelled images: scan, decode, cache, split, shard, load; the demo data."""
