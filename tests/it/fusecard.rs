//! A FUSE-backed card that can be made to fail (being written by a helper).
