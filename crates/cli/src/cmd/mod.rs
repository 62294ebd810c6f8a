//! One module per subcommand.

pub mod apply;
pub mod check;
pub mod demo;
pub mod disable;
pub mod force;
pub mod inspect;
pub mod load;
pub mod stacks;
pub mod status;
pub mod transition;
pub mod unload;
