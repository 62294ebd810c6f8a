//! relive-unwind: framehop glue, signal frames and the reliable/unreliable verdict. Pure over a memory reader.
#![forbid(unsafe_code)]
