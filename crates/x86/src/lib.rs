//! relive-x86: prologue analysis, relocation of displaced instructions, stub and jump encoding. Pure.
#![forbid(unsafe_code)]
