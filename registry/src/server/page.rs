//! Pagination of every list answer: `?limit=N&after=CURSOR` (N from 1 to [`MAX_PAGE`],
//! [`DEFAULT_PAGE`] when not given), the items after the cursor in the list's order, and a
//! `Link: <PATH?limit=N&after=LAST>; rel="next"` header while more remain. The body stays a
//! plain JSON array (a station's audit copy pages its `lines`). A cursor is the last item's id
//! (a sequence number for the trail and audit copies). Lists that grow with use (trains,
//! tasks, jobs, a station's runs, the trail, audit copies) are paged by the database
//! (`Db::keyset`, indexed); users and stations, which an admin adds, are paged in memory.
//!
//! Owns the query parameters and the header. Must not decide what a caller may see: the
//! handlers filter first, then page.

use super::{ApiError, Req, bad_request, json};
use axum::http::HeaderValue;
use axum::response::Response;

/// Items per page when the caller does not say.
pub const DEFAULT_PAGE: usize = 500;
/// Most items per page.
pub const MAX_PAGE: usize = 1000;

pub(super) struct Page {
    pub(super) limit: usize,
    pub(super) after: Option<String>,
}

/// The page a request asks for.
pub(super) fn page(r: &Req) -> Result<Page, ApiError> {
    let limit = match r.query_param("limit") {
        None => DEFAULT_PAGE,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| bad_request(format!("limit is 1 to {MAX_PAGE}")))?,
    };
    let after = match r.query_param("after") {
        None => None,
        Some(a) if crate::request::plain_name(&a) => Some(a),
        Some(_) => return Err(bad_request("after is the id of the last item of a page")),
    };
    Ok(Page { limit, after })
}

impl Page {
    /// The cursor as a sequence number (for lists ordered by one, from 0): -1 for the start.
    pub(super) fn after_seq(&self) -> Result<i64, ApiError> {
        match &self.after {
            None => Ok(-1),
            Some(a) => a
                .parse::<i64>()
                .map_err(|_| bad_request("after is a sequence number here")),
        }
    }

    /// Rows to fetch from a paged query: one more than the page says whether another follows.
    pub(super) fn fetch(&self) -> usize {
        self.limit.saturating_add(1)
    }

    /// A paged query's rows (`None`: the cursor named no item of the list, refused).
    pub(super) fn known<T>(&self, rows: Option<Vec<T>>) -> Result<Vec<T>, ApiError> {
        rows.ok_or_else(|| bad_request("after names no item of this list"))
    }

    /// `items` (the whole list, in order) from after the cursor; an unknown cursor is refused.
    pub(super) fn skip<T>(
        &self,
        items: Vec<T>,
        id: impl Fn(&T) -> &str,
    ) -> Result<Vec<T>, ApiError> {
        let Some(after) = &self.after else {
            return Ok(items);
        };
        let at = items
            .iter()
            .position(|t| id(t) == after)
            .ok_or_else(|| bad_request("after names no item of this list"))?;
        Ok(items.into_iter().skip(at.saturating_add(1)).collect())
    }

    /// The answer: at most `limit` of `rest` (the items after the cursor, in order; more may
    /// follow), and the link to the next page when there are more.
    pub(super) fn answer<T: serde::Serialize>(
        &self,
        r: &Req,
        mut rest: Vec<T>,
        id: impl Fn(&T) -> String,
    ) -> Response {
        let more = rest.len() > self.limit;
        rest.truncate(self.limit);
        let mut resp = json(&rest);
        if more && let Some(last) = rest.last() {
            self.link(r, &id(last), &mut resp);
        }
        resp
    }

    /// Add the link to the page after `last` to `resp`.
    pub(super) fn link(&self, r: &Req, last: &str, resp: &mut Response) {
        let link = format!(
            "<{}?limit={}&after={last}>; rel=\"next\"",
            r.path, self.limit
        );
        if let Ok(v) = HeaderValue::from_str(&link) {
            resp.headers_mut().insert("link", v);
        }
    }
}

/// The next page's path and query from a `Link` header (what clients follow).
pub fn next_link(link: &str) -> Option<&str> {
    link.split(',').find_map(|part| {
        let (target, params) = part.trim().split_once(';')?;
        params
            .split(';')
            .any(|p| p.trim() == "rel=\"next\"")
            .then(|| target.trim().strip_prefix('<')?.strip_suffix('>'))
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::next_link;

    #[test]
    fn next_links_are_found_and_nothing_else() {
        assert_eq!(
            next_link("</v1/tasks?limit=2&after=ab>; rel=\"next\""),
            Some("/v1/tasks?limit=2&after=ab")
        );
        assert_eq!(
            next_link("</a>; rel=\"prev\", </b>; rel=\"next\""),
            Some("/b")
        );
        assert_eq!(next_link("</a>; rel=\"prev\""), None);
        assert_eq!(next_link("garbage"), None);
    }
}
