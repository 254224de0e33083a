//! Line charts for `cargo xtask report`, drawn with plotters into SVG and PNG (labels in a
//! bundled DejaVu Sans subset, so the PNGs need no system fonts).
//!
//! Made to be read: each series has its own colour, dash pattern and marker shape (so series
//! that coincide, e.g. base / LoRA / Serial LoRA spectra, stay distinguishable), optional
//! mean ± std bands, the legend in a strip beside the data, tick labels printed cleanly (no
//! `0.7000000000000001`), integer-only ticks on step axes, rank ticks (2, 4, 8) on a log2 rank
//! axis, and a caption line under the figure saying what was run.
use std::path::Path;
use std::sync::Once;

use anyhow::{Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

/// One line: its name, points and an optional band `(x, low, high)` (mean ± std over seeds).
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub band: Vec<(f64, f64, f64)>,
}

impl Series {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self { name: name.into(), points, band: Vec::new() }
    }
}

/// How the x axis is labelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XTicks {
    /// Plain numbers.
    Auto,
    /// Integers only (steps, indices).
    Integer,
    /// x is log2 of a power of two (rank): labelled 2, 4, 8, … at integer x only.
    Pow2,
    /// x is log10 of a count (parameters): labelled 100, 1,000, 10,000, … at integer x only.
    Pow10,
}

pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_y: bool,
    pub x_ticks: XTicks,
    pub series: Vec<Series>,
}

/// Panels on a grid of `cols` columns, a title above and a caption line below.
pub struct Figure {
    pub title: String,
    pub caption: String,
    pub cols: usize,
    pub panels: Vec<Panel>,
}

const PANEL: (u32, u32) = (560, 340);
/// Width of the legend strip on the right of each panel.
const LEGEND_W: u32 = 130;
const CAPTION_H: u32 = 28;

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // the bundled file is a valid font; a failure would only lose the labels
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, include_bytes!("../assets/DejaVuSans-subset.ttf"));
    });
}

/// A tick label without float noise: up to 4 significant digits, trailing zeros removed,
/// scientific notation outside [1e-3, 1e5).
pub fn tick_label(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return if v == 0.0 { "0".into() } else { String::new() };
    }
    let a = v.abs();
    if !(1e-3..1e5).contains(&a) {
        let s = format!("{v:.1e}");
        return s.replace(".0e", "e");
    }
    let decimals = (3 - a.log10().floor() as i32).clamp(0, 6) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s }
}

/// `100000` → `100,000`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn is_integer(x: f64) -> bool {
    (x - x.round()).abs() < 1e-9
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

/// Line style of series `i`: solid, dashed, dotted in turn (with the colour).
fn dash(i: usize) -> Option<(u32, u32)> {
    match i % 3 {
        0 => None,
        1 => Some((8, 5)),
        _ => Some((2, 4)),
    }
}

fn color(i: usize) -> RGBAColor {
    // colour-blind-safe (Okabe–Ito) first, then plotters' palette
    const OKABE_ITO: [(u8, u8, u8); 7] = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233), (0, 0, 0)];
    match OKABE_ITO.get(i) {
        Some(&(r, g, b)) => RGBColor(r, g, b).to_rgba(),
        None => Palette99::pick(i).to_rgba(),
    }
}

/// Marker `i` (circle, triangle, square, cross) at pixel position `c`.
fn marker<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, c: (i32, i32), i: usize, style: ShapeStyle) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let e = |e| anyhow::anyhow!("{e:?}");
    let (x, y) = c;
    match i % 4 {
        0 => area.draw(&Circle::new(c, 4, style.filled())).map_err(e),
        1 => area.draw(&Polygon::new(vec![(x, y - 5), (x - 5, y + 4), (x + 5, y + 4)], style.filled())).map_err(e),
        2 => area.draw(&Rectangle::new([(x - 4, y - 4), (x + 4, y + 4)], style.filled())).map_err(e),
        _ => {
            area.draw(&PathElement::new(vec![(x - 5, y - 5), (x + 5, y + 5)], style.stroke_width(2))).map_err(e)?;
            area.draw(&PathElement::new(vec![(x - 5, y + 5), (x + 5, y - 5)], style.stroke_width(2))).map_err(e)
        }
    }
}

/// A polyline in pixel space with series `i`'s dash pattern.
fn polyline<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, pts: &[(i32, i32)], i: usize, style: ShapeStyle) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let e = |e| anyhow::anyhow!("{e:?}");
    let Some((on, off)) = dash(i) else {
        return area.draw(&PathElement::new(pts.to_vec(), style)).map_err(e);
    };
    // walk the path, drawing `on` pixels out of every `on + off`
    let (on, period) = (on as f64, (on + off) as f64);
    let mut phase = 0.0;
    for w in pts.windows(2) {
        let (a, b) = ((w[0].0 as f64, w[0].1 as f64), (w[1].0 as f64, w[1].1 as f64));
        let len = ((b.0 - a.0).powi(2) + (b.1 - a.1).powi(2)).sqrt();
        let mut t = 0.0;
        while t < len {
            let in_dash = phase % period < on;
            let step = if in_dash { on - phase % period } else { period - phase % period }.min(len - t);
            if in_dash && step > 0.0 {
                let p = |s: f64| ((a.0 + (b.0 - a.0) * s / len).round() as i32, (a.1 + (b.1 - a.1) * s / len).round() as i32);
                area.draw(&PathElement::new(vec![p(t), p(t + step)], style)).map_err(e)?;
            }
            t += step.max(1e-6);
            phase += step.max(1e-6);
        }
    }
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, p: &Panel) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let e = |e| anyhow::anyhow!("{e:?}");
    let (w, _) = area.dim_in_pixel();
    let (plot, legend) = area.split_horizontally(w.saturating_sub(LEGEND_W));
    let xs = || p.series.iter().flat_map(|s| s.points.iter().map(|q| q.0).chain(s.band.iter().map(|b| b.0)));
    let ys = || p.series.iter().flat_map(|s| s.points.iter().map(|q| q.1).chain(s.band.iter().flat_map(|b| [b.1, b.2])));
    let (mut x0, mut x1) = bounds(xs(), false);
    if p.x_ticks != XTicks::Auto {
        // whole units of margin, so the first and last points sit on labelled ticks
        let (lo, hi) = xs().filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
        if lo.is_finite() {
            let pad = if matches!(p.x_ticks, XTicks::Pow2 | XTicks::Pow10) { 0.3 } else { ((hi - lo) * 0.04).max(0.3) };
            (x0, x1) = (lo - pad, hi + pad);
        }
    }
    let (y0, y1) = bounds(ys(), p.log_y);
    // integer / pow2 axes: one label per integer when they fit, never fractional ones
    let span = (x1 - x0).max(1.0);
    let x_labels = match p.x_ticks {
        XTicks::Auto => 8,
        _ => (span.ceil() as usize + 1).min(10),
    };
    let x_fmt = |x: &f64| match p.x_ticks {
        XTicks::Auto => tick_label(*x),
        XTicks::Integer if is_integer(*x) => format!("{}", x.round() as i64),
        XTicks::Pow2 if is_integer(*x) && *x >= 0.0 => format!("{}", 1u64 << (x.round() as u32).min(62)),
        XTicks::Pow10 if is_integer(*x) && *x >= 0.0 => thousands(10u64.pow((x.round() as u32).min(18))),
        _ => String::new(),
    };
    let y_fmt = |y: &f64| tick_label(*y);
    let mut chart = ChartBuilder::on(&plot);
    chart.caption(&p.title, ("sans-serif", 15)).margin(8).x_label_area_size(38).y_label_area_size(58);
    // pixel positions of every series (so lines, markers and bands are drawn in pixel space
    // with dash patterns and marker shapes plotters' series types do not offer)
    type Pixels = Vec<(i32, i32)>;
    let mut pixel_series: Vec<(Pixels, Pixels)> = Vec::new();
    macro_rules! mesh {
        ($c:expr) => {{
            let mut c = $c;
            c.configure_mesh()
                .x_desc(p.x_label.as_str())
                .y_desc(p.y_label.as_str())
                .x_labels(x_labels)
                .y_labels(6)
                .x_label_formatter(&x_fmt)
                .y_label_formatter(&y_fmt)
                .light_line_style(RGBColor(235, 235, 235))
                .label_style(("sans-serif", 12))
                .draw()
                .map_err(e)?;
            for s in &p.series {
                let ok = |y: f64| y.is_finite() && (!p.log_y || y > 0.0);
                let line: Vec<(i32, i32)> = s.points.iter().filter(|q| ok(q.1)).map(|&(x, y)| c.backend_coord(&(x, y))).collect();
                let mut band: Vec<(i32, i32)> = s.band.iter().filter(|b| ok(b.1) && ok(b.2)).map(|&(x, _, hi)| c.backend_coord(&(x, hi))).collect();
                band.extend(s.band.iter().rev().filter(|b| ok(b.1) && ok(b.2)).map(|&(x, lo, _)| c.backend_coord(&(x, lo))));
                pixel_series.push((line, band));
            }
        }};
    }
    if p.log_y {
        let c = chart.build_cartesian_2d(x0..x1, (y0..y1).log_scale()).map_err(e)?;
        mesh!(c);
    } else {
        let c = chart.build_cartesian_2d(x0..x1, y0..y1).map_err(e)?;
        mesh!(c);
    }
    // backend coordinates are relative to the whole drawing; draw on an area at the origin
    let (ox, oy) = plot.get_base_pixel();
    let canvas = &plot;
    let shift = |v: &[(i32, i32)]| v.iter().map(|&(x, y)| (x - ox, y - oy)).collect::<Vec<_>>();
    for (i, (_, band)) in pixel_series.iter().enumerate() {
        if band.len() >= 3 {
            canvas.draw(&Polygon::new(shift(band), color(i).mix(0.18).filled())).map_err(e)?;
        } else if let [hi, lo] = shift(band)[..] {
            // a band of one point: an error bar with caps
            let style = color(i).stroke_width(2);
            for path in [vec![hi, lo], vec![(hi.0 - 5, hi.1), (hi.0 + 5, hi.1)], vec![(lo.0 - 5, lo.1), (lo.0 + 5, lo.1)]] {
                canvas.draw(&PathElement::new(path, style)).map_err(e)?;
            }
        }
    }
    // later series thinner, so a line drawn over an identical one leaves the first visible
    let n = p.series.len();
    for (i, (line, _)) in pixel_series.iter().enumerate() {
        let style = color(i).stroke_width(if n > 1 && i + 1 < n { 3 } else { 2 });
        polyline(canvas, &shift(line), i, style)?;
        // markers on every k-th point, each series at another phase, so coinciding series
        // show each other's markers instead of stacking them
        let every = (line.len() / 10).max(n.min(line.len() / 3)).max(1);
        for (j, &c) in shift(line).iter().enumerate() {
            if j % every == i % every {
                marker(canvas, c, i, color(i).into())?;
            }
        }
    }
    // the legend, beside the data
    for (i, s) in p.series.iter().enumerate() {
        let y = 40 + 22 * i as i32;
        let style = color(i).stroke_width(2);
        polyline(&legend, &[(4, y), (34, y)], i, style)?;
        marker(&legend, (19, y), i, color(i).into())?;
        legend.draw(&Text::new(s.name.clone(), (40, y - 7), ("sans-serif", 12))).map_err(e)?;
    }
    Ok(())
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, f: &Figure, (rows, cols): (usize, usize)) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let e = |e| anyhow::anyhow!("{e:?}");
    root.fill(&WHITE).map_err(e)?;
    let (w, h) = root.dim_in_pixel();
    let caption_h = CAPTION_H + 16 * (wrap(&f.caption, w).len() as u32).saturating_sub(1);
    let (body, caption) = root.split_vertically(h.saturating_sub(caption_h));
    let body = body.titled(&f.title, ("sans-serif", 18)).map_err(e)?;
    for (area, panel) in body.split_evenly((rows, cols)).iter().zip(&f.panels) {
        draw_panel(area, panel)?;
    }
    let (w, _) = caption.dim_in_pixel();
    for (i, line) in wrap(&f.caption, w).iter().enumerate() {
        caption.draw(&Text::new(line.clone(), (10, 4 + 16 * i as i32), ("sans-serif", 12).into_font().color(&RGBColor(70, 70, 70)))).map_err(e)?;
    }
    root.present().map_err(e)?;
    Ok(())
}

/// The caption broken into lines that fit `width` pixels (about 6.6 px per character at 12 px).
fn wrap(text: &str, width: u32) -> Vec<String> {
    let max = ((width.saturating_sub(20)) as f64 / 6.6) as usize;
    let mut lines: Vec<String> = vec![String::new()];
    for word in text.split(' ') {
        let last = lines.last_mut().map(|l| l.len()).unwrap_or(0);
        if last > 0 && last + 1 + word.chars().count() > max.max(20) {
            lines.push(String::new());
        }
        if let Some(l) = lines.last_mut() {
            if !l.is_empty() {
                l.push(' ');
            }
            l.push_str(word);
        }
    }
    lines
}

/// Writes `stem.svg` and `stem.png`.
pub fn save(f: &Figure, stem: &Path) -> Result<()> {
    register_font();
    let cols = f.cols.max(1).min(f.panels.len().max(1));
    let rows = f.panels.len().div_ceil(cols).max(1);
    let caption_h = CAPTION_H + 16 * (wrap(&f.caption, PANEL.0 * cols as u32).len() as u32).saturating_sub(1);
    let size = (PANEL.0 * cols as u32, PANEL.1 * rows as u32 + 30 + caption_h);
    let svg = stem.with_extension("svg");
    draw(SVGBackend::new(&svg, size).into_drawing_area(), f, (rows, cols)).with_context(|| format!("drawing {}", svg.display()))?;
    let mut buf = vec![0u8; (size.0 * size.1 * 3) as usize];
    draw(BitMapBackend::with_buffer(&mut buf, size).into_drawing_area(), f, (rows, cols)).with_context(|| format!("drawing {}", stem.display()))?;
    let png = stem.with_extension("png");
    image::RgbImage::from_raw(size.0, size.1, buf).context("bitmap size")?.save(&png).with_context(|| format!("writing {}", png.display()))
}

#[cfg(test)]
mod tests {
    use super::tick_label;

    #[test]
    fn tick_labels_are_clean() {
        assert_eq!(tick_label(0.7000000000000001), "0.7");
        assert_eq!(tick_label(2.0), "2");
        assert_eq!(tick_label(12.5), "12.5");
        assert_eq!(tick_label(0.0001234), "1.2e-4");
        assert_eq!(tick_label(123456.0), "1.2e5");
        assert_eq!(tick_label(0.0), "0");
    }
}
