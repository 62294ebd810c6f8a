//! Demangling of Rust (legacy and v0) and Itanium C++ names (CRATES.md §2.7).

/// Demangles `name` if it is a Rust or C++ mangled name; returns it unchanged otherwise.
/// Rust hashes are dropped (`{:#}`), C++ names keep their parameter lists.
pub fn demangle(name: &str) -> String {
    if let Ok(d) = rustc_demangle::try_demangle(name) {
        return format!("{d:#}");
    }
    if name.starts_with("_Z")
        && let Ok(sym) = cpp_demangle::Symbol::new(name.as_bytes())
        && let Ok(s) = sym.demangle()
    {
        return s;
    }
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::demangle;

    #[test]
    fn rust_legacy() {
        assert_eq!(
            demangle("_ZN4core3fmt5write17h0123456789abcdefE"),
            "core::fmt::write"
        );
    }

    #[test]
    fn rust_v0() {
        assert_eq!(demangle("_RNvCs1234_7mycrate3foo"), "mycrate::foo");
    }

    #[test]
    fn cpp() {
        assert_eq!(demangle("_ZN3foo3barEi"), "foo::bar(int)");
    }

    #[test]
    fn plain_c_is_unchanged() {
        assert_eq!(demangle("main"), "main");
        assert_eq!(demangle("_Zzz_not_mangled"), "_Zzz_not_mangled");
    }
}
