//! One module per subcommand.

pub mod apply;
pub mod check;
pub mod demo;
pub mod disable;
pub mod force;
pub mod stacks;
pub mod transition;
