//! Patch cores → frame arrays.
