//! `console`: the staff console's pages against their JSON endpoints, for a
//! tenant with 1,000,000 files over 10,000 customers.
//!
//! - A customer's Files tab (`GET /app/customers/{customer_id}/files`: HTML,
//!   50 rows, the filter form), next to the JSON list it shows
//!   (`GET /v1/customers/{customer_id}/files?limit=50`) measured in the same
//!   run, a random customer each request. The page reads the same read model
//!   with the same query; what it adds is rendering.
//! - The customers list (`GET /v1/customers?limit=50`, the console's start
//!   page's data) and its search box (`q`: the start of a customer id, a random
//!   `cust-N` matching 1 to 111 of the 10,000 customers).
//!
//! The files read model is seeded with `COPY` exactly like `list`, and the
//! customers read model from it in one statement (each customer's file count
//! and newest upload); both are analyzed before the run. Requests go over HTTP
//! from one client with a staff token (`Authorization: Bearer`, which the pages
//! take like the API), so each figure is the server's time plus a loopback
//! round trip, the same for the page and the endpoint. Goal: p99 under 10 ms
//! (issue 13).

use std::time::Duration;

use anyhow::Context as _;

use super::Ctx;
use super::list::{ReadGround, on_read_ground};
use super::report::{Figure, Goal};
use super::seed::Rng;
use super::stats::{self, Load};

const SCENARIO: &str = "console";
const TENANT: &str = "bench-console";

/// What one loop requests, for a random customer `n` of `customers`.
#[derive(Debug, Clone, Copy)]
enum Request {
    FilesPage,
    FilesJson,
    Customers,
    CustomersSearch,
}

impl Request {
    fn path(self, n: u64) -> String {
        match self {
            Self::FilesPage => format!("/app/customers/cust-{n}/files"),
            Self::FilesJson => format!("/v1/customers/cust-{n}/files?limit=50"),
            Self::Customers => "/v1/customers?limit=50".to_owned(),
            // `cust-N` with N below 1,000: itself and the ids that go on
            // with one or two more digits.
            Self::CustomersSearch => format!("/v1/customers?q=cust-{}&limit=50", n % 1000),
        }
    }
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Figure>> {
    on_read_ground(ctx, TENANT, measure).await
}

async fn measure(ctx: &Ctx, ground: &ReadGround) -> anyhow::Result<Vec<Figure>> {
    let ReadGround {
        app,
        token,
        files,
        customers,
    } = ground;
    let (files, customers) = (*files, *customers);
    let load = |request: Request| {
        let (app, token) = (app.clone(), token.clone());
        async move {
            let warmup = ctx.size(Duration::from_secs(1), Duration::from_millis(200));
            let window = ctx.size(Duration::from_secs(6), Duration::from_secs(1));
            let op = move |client: usize, i: u64| {
                let (app, token) = (app.clone(), token.clone());
                async move {
                    let n = Rng::new((client as u64) << 32 | i).below(customers);
                    let response = app
                        .client
                        .get(app.url(&request.path(n)))
                        .bearer_auth(token.as_str())
                        .send()
                        .await?;
                    let status = response.status();
                    anyhow::ensure!(status.is_success(), "{request:?} answered {status}");
                    response.bytes().await?;
                    Ok(())
                }
            };
            stats::closed_loop(1, warmup, window, op)
                .await
                .with_context(|| format!("{request:?}"))
        }
    };
    let page = load(Request::FilesPage).await?;
    let json = load(Request::FilesJson).await?;
    let list = load(Request::Customers).await?;
    let search = load(Request::CustomersSearch).await?;
    Ok(figures(&page, &json, &list, &search, files, customers))
}

fn figures(
    page: &Load,
    json: &Load,
    list: &Load,
    search: &Load,
    files: u64,
    customers: u64,
) -> Vec<Figure> {
    let json_is = "GET /v1/customers/{id}/files?limit=50, same run";
    let requests = |load: &Load| format!("{} requests at {:.0}/s", load.ops, load.per_second());
    vec![
        Figure::new(SCENARIO, "Files tab page p50, 1 client", "ms")
            .ours(page.latencies.p50_ms())
            .baseline(json.latencies.p50_ms(), json_is)
            .goal(Goal::Report),
        Figure::new(SCENARIO, "Files tab page p99, 1 client", "ms")
            .ours(page.latencies.p99_ms())
            .baseline(json.latencies.p99_ms(), json_is)
            .note(format!(
                "GET /app/customers/{{id}}/files, HTML, 50 rows; {}; {files} files, {customers} customers",
                requests(page)
            ))
            .goal(Goal::AtMost(10.0)),
        Figure::new(SCENARIO, "customers list p50, 1 client", "ms")
            .ours(list.latencies.p50_ms())
            .goal(Goal::Report),
        Figure::new(SCENARIO, "customers list p99, 1 client", "ms")
            .ours(list.latencies.p99_ms())
            .note(format!(
                "GET /v1/customers?limit=50; {}; {customers} customers",
                requests(list)
            ))
            .goal(Goal::AtMost(10.0)),
        Figure::new(SCENARIO, "customers search p50 / p99, 1 client", "ms")
            .ours(search.latencies.p50_ms())
            .note(format!(
                "GET /v1/customers?q=cust-N&limit=50 (1 to 111 matches); p99 {:.2} ms; {}",
                search.latencies.p99_ms(),
                requests(search)
            ))
            .goal(Goal::Report),
    ]
}
