//! Line charts for `cargo xtask report`, drawn with plotters into SVG and PNG (labels in a
//! bundled DejaVu Sans subset, so the PNGs need no system fonts).
use std::path::Path;
use std::sync::Once;

use anyhow::{Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

/// One line: its name and points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_y: bool,
    pub series: Vec<Series>,
}

/// Panels on a grid of `cols` columns.
pub struct Figure {
    pub title: String,
    pub cols: usize,
    pub panels: Vec<Panel>,
}

const PANEL: (u32, u32) = (460, 340);

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // the bundled file is a valid font; a failure would only lose the labels
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, include_bytes!("../assets/DejaVuSans-subset.ttf"));
    });
}

fn bounds(values: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (lo, hi) = values.filter(|v| v.is_finite() && (!log || *v > 0.0)).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        return if log { (0.1, 1.0) } else { (0.0, 1.0) };
    }
    if log {
        (lo / 1.5, hi * 1.5)
    } else {
        let pad = if hi > lo { (hi - lo) * 0.08 } else { lo.abs().max(1.0) * 0.1 };
        (lo - pad, hi + pad)
    }
}

fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, p: &Panel) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let points = || p.series.iter().flat_map(|s| s.points.iter());
    let (x0, x1) = bounds(points().map(|q| q.0), false);
    let (y0, y1) = bounds(points().map(|q| q.1), p.log_y);
    let mut chart = ChartBuilder::on(area);
    chart.caption(&p.title, ("sans-serif", 16)).margin(8).x_label_area_size(36).y_label_area_size(56);
    macro_rules! finish {
        ($c:expr) => {{
            let mut c = $c;
            c.configure_mesh().x_desc(p.x_label.as_str()).y_desc(p.y_label.as_str()).label_style(("sans-serif", 12)).draw().map_err(|e| anyhow::anyhow!("{e:?}"))?;
            for (i, s) in p.series.iter().enumerate() {
                let color = Palette99::pick(i).to_rgba();
                let pts = s.points.iter().copied().filter(|q| q.1.is_finite() && (!p.log_y || q.1 > 0.0));
                c.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?
                    .label(s.name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
                if s.points.len() < 30 {
                    c.draw_series(pts.map(|q| Circle::new(q, 3, color.filled()))).map_err(|e| anyhow::anyhow!("{e:?}"))?;
                }
            }
            if !p.series.is_empty() {
                c.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).label_font(("sans-serif", 12)).draw().map_err(|e| anyhow::anyhow!("{e:?}"))?;
            }
        }};
    }
    if p.log_y {
        finish!(chart.build_cartesian_2d(x0..x1, (y0..y1).log_scale()).map_err(|e| anyhow::anyhow!("{e:?}"))?);
    } else {
        finish!(chart.build_cartesian_2d(x0..x1, y0..y1).map_err(|e| anyhow::anyhow!("{e:?}"))?);
    }
    Ok(())
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, f: &Figure, (rows, cols): (usize, usize)) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let root = root.titled(&f.title, ("sans-serif", 20)).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    for (area, panel) in root.split_evenly((rows, cols)).iter().zip(&f.panels) {
        draw_panel(area, panel)?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(())
}

/// Writes `stem.svg` and `stem.png`.
pub fn save(f: &Figure, stem: &Path) -> Result<()> {
    register_font();
    let cols = f.cols.max(1).min(f.panels.len().max(1));
    let rows = f.panels.len().div_ceil(cols).max(1);
    let size = (PANEL.0 * cols as u32, PANEL.1 * rows as u32 + 30);
    let svg = stem.with_extension("svg");
    draw(SVGBackend::new(&svg, size).into_drawing_area(), f, (rows, cols)).with_context(|| format!("drawing {}", svg.display()))?;
    let mut buf = vec![0u8; (size.0 * size.1 * 3) as usize];
    draw(BitMapBackend::with_buffer(&mut buf, size).into_drawing_area(), f, (rows, cols)).with_context(|| format!("drawing {}", stem.display()))?;
    let png = stem.with_extension("png");
    image::RgbImage::from_raw(size.0, size.1, buf).context("bitmap size")?.save(&png).with_context(|| format!("writing {}", png.display()))
}
