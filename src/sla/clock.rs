//! The SLA clock state machine (pure).
