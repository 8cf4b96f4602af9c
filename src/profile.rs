//! Corpus profiles: what the engine needs to know about a corpus that the core must not
//! (which metadata fields name a document). The LicenseDB is the default profile.

use std::collections::BTreeMap;

/// The LicenseDB profile's identifier fields: a license is named by its key (the document
/// id), its SPDX id, its full name or its short name. Weight 1 each; a field matches when its
/// whole value occurs among the question's words (`ragtune_index::Index::search_identifiers`).
pub const LICENSEDB_IDENTIFIER_FIELDS: &[(&str, f32)] = &[
    (ragtune_index::DOC_ID_KEY, 1.0),
    ("spdx_license_key", 1.0),
    ("name", 1.0),
    ("short_name", 1.0),
];

/// The identifier fields of the default profile, as `[retrieval] identifier_fields` takes
/// them.
pub fn default_identifier_fields() -> BTreeMap<String, f32> {
    LICENSEDB_IDENTIFIER_FIELDS
        .iter()
        .map(|&(k, w)| (k.to_string(), w))
        .collect()
}
