//! Legacy x86 platform devices.
