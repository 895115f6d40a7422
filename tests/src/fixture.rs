//! Packet fixture runner.
