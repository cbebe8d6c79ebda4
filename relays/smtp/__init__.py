"""The SMTP session layer and connection pool shared by `static`, `lmtp` and `mx`."""
