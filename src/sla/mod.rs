//! SLA arithmetic: business calendars and the response-time clocks that run on them (pure).

pub mod calendar;
pub mod clock;
pub mod stats;

#[cfg(test)]
mod calendar_props;

pub use calendar::Calendar;
