"""One module per corpus; each turns a corpus folder into manifest rows."""
