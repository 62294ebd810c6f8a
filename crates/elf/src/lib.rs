//! relive-elf: modules, load bias, symbols, build-ids and the patch manifest. Pure over bytes.
#![forbid(unsafe_code)]
