pub mod alert;
