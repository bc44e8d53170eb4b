//! The CredentialPolicy kind. `rotation` decides, purely and with the clock passed in, what is
//! due, overdue or in grace; `controller` gathers the tracked credentials and reconciles each
//! policy; `apply` holds its Kubernetes writes (status, reminder Events, rotation annotations).

pub mod apply;
pub mod controller;
pub mod rotation;
