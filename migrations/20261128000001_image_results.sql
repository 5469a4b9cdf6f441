-- One row per output of an image: its variant's URL and what we know of it.
-- Written by the db-commit stage with upserts keyed on (job, image, variant),
-- so a redelivered batch never adds a second row. Portable across MariaDB,
-- PostgreSQL and SQLite.
CREATE TABLE IF NOT EXISTS image_results (
    job_id VARCHAR(64) NOT NULL,
    image_index INTEGER NOT NULL,
    variant VARCHAR(64) NOT NULL,
    vendor_id VARCHAR(128) NOT NULL,
    record_id VARCHAR(255) NOT NULL,
    url VARCHAR(2048) NOT NULL,
    content_type VARCHAR(64) NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    bytes BIGINT NOT NULL,
    notes TEXT NOT NULL,
    submitted_ms BIGINT NOT NULL,
    committed_ms BIGINT NOT NULL,
    PRIMARY KEY (job_id, image_index, variant)
);

CREATE INDEX idx_image_results_vendor_record ON image_results (vendor_id, record_id);
