//! One module per subcommand.

pub mod stacks;
