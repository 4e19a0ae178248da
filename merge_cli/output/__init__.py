"""The output side of the file: the on-disk contract, shard writer, index, reader and inspection."""
