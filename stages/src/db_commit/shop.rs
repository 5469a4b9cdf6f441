//! db-commit's shop statement: the operator's SQL template with named
//! placeholders, turned into the dialect's positional ones. Parses only;
//! running it is the writer's.

use super::{Dialect, ResultRow};

/// A value the shop statement can refer to by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShopParam {
    Url,
    RecordId,
    VendorId,
    Variant,
    JobId,
}

impl ShopParam {
    fn of_name(name: &str) -> Option<ShopParam> {
        match name {
            "url" => Some(ShopParam::Url),
            "record_id" => Some(ShopParam::RecordId),
            "vendor_id" => Some(ShopParam::VendorId),
            "variant" => Some(ShopParam::Variant),
            "job_id" => Some(ShopParam::JobId),
            _ => None,
        }
    }

    pub(super) fn of_row(self, r: &ResultRow) -> &str {
        match self {
            ShopParam::Url => &r.url,
            ShopParam::RecordId => &r.record_id,
            ShopParam::VendorId => &r.vendor_id,
            ShopParam::Variant => &r.variant,
            ShopParam::JobId => &r.job_id,
        }
    }
}

/// What is wrong with a shop statement template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("unterminated {0} quote")]
    UnterminatedQuote(char),
    #[error("unterminated comment")]
    UnterminatedComment,
    #[error("unknown placeholder :{0} (known: :url, :record_id, :vendor_id, :variant, :job_id)")]
    UnknownPlaceholder(String),
    #[error("use named placeholders (:url, :record_id, ...), not {0}")]
    Positional(&'static str),
    #[error("the statement uses no placeholder, so it would write the same to every row")]
    NoPlaceholder,
}

/// The configured shop statement, its named placeholders turned into the
/// dialect's positional ones, and what to bind to each in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShopUpdate {
    pub sql: String,
    pub params: Vec<ShopParam>,
}

impl ShopUpdate {
    /// Translates `:name` placeholders outside quotes and comments. A
    /// positional placeholder in the template is refused: binding by
    /// position would silently depend on our order.
    pub fn parse(template: &str, dialect: Dialect) -> Result<ShopUpdate, TemplateError> {
        let chars: Vec<char> = template.chars().collect();
        let mut sql = String::with_capacity(template.len());
        let mut params = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            match c {
                '\'' | '"' | '`' => {
                    // A quoted literal or identifier, copied as is; a doubled
                    // quote inside it just closes and reopens it.
                    let end = chars[i + 1..]
                        .iter()
                        .position(|&d| d == c)
                        .ok_or(TemplateError::UnterminatedQuote(c))?;
                    sql.extend(&chars[i..=i + 1 + end]);
                    i += end + 2;
                }
                '-' if chars.get(i + 1) == Some(&'-') => {
                    let end = chars[i..]
                        .iter()
                        .position(|&d| d == '\n')
                        .map_or(chars.len(), |p| i + p);
                    sql.extend(&chars[i..end]);
                    i = end;
                }
                '/' if chars.get(i + 1) == Some(&'*') => {
                    let end = (i + 2..chars.len().saturating_sub(1))
                        .find(|&j| chars[j] == '*' && chars[j + 1] == '/')
                        .ok_or(TemplateError::UnterminatedComment)?;
                    sql.extend(&chars[i..end + 2]);
                    i = end + 2;
                }
                ':' if chars.get(i + 1) == Some(&':') => {
                    // A PostgreSQL cast.
                    sql.push_str("::");
                    i += 2;
                }
                ':' if chars.get(i + 1).is_some_and(|d| d.is_ascii_alphabetic() || *d == '_') => {
                    let len = chars[i + 1..]
                        .iter()
                        .position(|d| !(d.is_ascii_alphanumeric() || *d == '_'))
                        .unwrap_or(chars.len() - i - 1);
                    let name: String = chars[i + 1..i + 1 + len].iter().collect();
                    let p = ShopParam::of_name(&name).ok_or(TemplateError::UnknownPlaceholder(name))?;
                    params.push(p);
                    match dialect {
                        Dialect::Postgres => sql.push_str(&format!("${}", params.len())),
                        _ => sql.push('?'),
                    }
                    i += 1 + len;
                }
                '?' => return Err(TemplateError::Positional("?")),
                '$' if chars.get(i + 1).is_some_and(|d| d.is_ascii_digit()) => {
                    return Err(TemplateError::Positional("$n"))
                }
                _ => {
                    sql.push(c);
                    i += 1;
                }
            }
        }
        if params.is_empty() {
            return Err(TemplateError::NoPlaceholder);
        }
        Ok(ShopUpdate { sql, params })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shop_placeholders_become_positional_in_order() {
        let t = "UPDATE products SET image_url = :url WHERE id = :record_id AND vendor_id = :vendor_id";
        let my = ShopUpdate::parse(t, Dialect::MySql).unwrap();
        assert_eq!(
            my.sql,
            "UPDATE products SET image_url = ? WHERE id = ? AND vendor_id = ?"
        );
        assert_eq!(
            my.params,
            vec![ShopParam::Url, ShopParam::RecordId, ShopParam::VendorId]
        );
        let pg = ShopUpdate::parse(t, Dialect::Postgres).unwrap();
        assert_eq!(
            pg.sql,
            "UPDATE products SET image_url = $1 WHERE id = $2 AND vendor_id = $3"
        );
    }

    #[test]
    fn shop_placeholders_skip_quotes_comments_and_casts() {
        let t = "UPDATE p SET u = :url, note = ':not_a_param' /* :nor */ WHERE id = :record_id::bigint -- :this\n";
        let pg = ShopUpdate::parse(t, Dialect::Postgres).unwrap();
        assert_eq!(
            pg.sql,
            "UPDATE p SET u = $1, note = ':not_a_param' /* :nor */ WHERE id = $2::bigint -- :this\n"
        );
        assert_eq!(pg.params, vec![ShopParam::Url, ShopParam::RecordId]);
    }

    #[test]
    fn shop_templates_with_unknown_or_positional_placeholders_are_refused() {
        assert_eq!(
            ShopUpdate::parse("UPDATE p SET u = :uri", Dialect::MySql),
            Err(TemplateError::UnknownPlaceholder("uri".into()))
        );
        assert_eq!(
            ShopUpdate::parse("UPDATE p SET u = ? WHERE id = :record_id", Dialect::MySql),
            Err(TemplateError::Positional("?"))
        );
        assert_eq!(
            ShopUpdate::parse("UPDATE p SET u = $1", Dialect::Postgres),
            Err(TemplateError::Positional("$n"))
        );
        assert_eq!(
            ShopUpdate::parse("UPDATE p SET u = 'x'", Dialect::Sqlite),
            Err(TemplateError::NoPlaceholder)
        );
        assert_eq!(
            ShopUpdate::parse("UPDATE p SET u = 'x", Dialect::Sqlite),
            Err(TemplateError::UnterminatedQuote('\''))
        );
    }
}
