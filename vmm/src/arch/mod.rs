//! x86_64 specifics: the guest memory map, boot protocols, MP table, CPUID and initial
//! register state. Everything here is computed on the caller's thread while the VM is
//! built; nothing here talks to KVM (the `vstate` module does).

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
