//! ragtune
