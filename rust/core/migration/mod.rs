//! The migration protocol's pure parts. The coordinators (session, epochs, the state machines)
//! are Python (`blockemu.migration`); what reads bytes off a hostile stream lives here.

pub mod frame;
