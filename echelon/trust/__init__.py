"""Trust across organizations: the signed federation manifest, the X.509 material for mTLS,
an organization's own key generation (enrolment), and the per-party kit directory."""
