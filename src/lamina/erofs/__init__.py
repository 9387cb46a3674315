"""EROFS images of layers: the on-disk format, a writer fed by a layer's tar
stream, and a small reader."""
