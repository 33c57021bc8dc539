//! PNG charts of a case's migrations: panels stacked over one time axis, one line per series,
//! drawn with plotters' bitmap backend and the bench's own pixel font (see `font.rs`).

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

use super::font;

const WIDTH: u32 = 1100;
const PANEL_HEIGHT: u32 = 300;
const HEADER: i32 = 44;
const LEFT: i32 = 84;
const RIGHT: i32 = 24;
/// Panel title and legend above each plot area.
const PANEL_TOP: i32 = 30;
/// Tick labels below each plot area.
const PANEL_BOTTOM: i32 = 30;
const TEXT: RGBColor = RGBColor(30, 30, 30);
const GRID: RGBColor = RGBColor(225, 225, 225);

/// Colours of successive runs.
pub const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// `color` mixed half and half with white.
pub fn light(color: RGBColor) -> RGBColor {
    let mix = |c: u8| ((u16::from(c) + 255) / 2) as u8;
    RGBColor(mix(color.0), mix(color.1), mix(color.2))
}

/// One series: (x, y) points joined by straight lines, or each drawn as a bar from the x axis.
pub struct Line {
    pub label: String,
    pub color: RGBColor,
    pub width: u32,
    pub points: Vec<(f64, f64)>,
    /// Each point a vertical bar from y = 0, not a polyline.
    pub bars: bool,
    /// x positions marked with a short tick under the plot (where a pre-copy round began).
    pub marks: Vec<f64>,
}

impl Line {
    /// A 2-pixel polyline, no marks under the plot.
    pub fn new(label: String, color: RGBColor, points: Vec<(f64, f64)>) -> Self {
        Self {
            label,
            color,
            width: 2,
            points,
            bars: false,
            marks: Vec::new(),
        }
    }
}

/// One plot area with its own y axis.
pub struct Panel {
    pub title: String,
    pub lines: Vec<Line>,
}

/// A tick step of 1, 2 or 5 times a power of ten giving about `count` steps over `range`.
fn tick_step(range: f64, count: f64) -> f64 {
    if range <= 0.0 || !range.is_finite() {
        return 1.0;
    }
    let raw = range / count;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = match raw / magnitude {
        n if n <= 1.0 => 1.0,
        n if n <= 2.0 => 2.0,
        n if n <= 5.0 => 5.0,
        _ => 10.0,
    };
    step * magnitude
}

/// An axis from 0 to a whole number of steps at or above `max`: (end, step).
fn axis(max: f64) -> (f64, f64) {
    let max = if max > 0.0 && max.is_finite() {
        max
    } else {
        1.0
    };
    let step = tick_step(max, 5.0);
    ((max / step).ceil().max(1.0) * step, step)
}

fn tick_label(value: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10()).ceil() as usize
    };
    format!("{value:.decimals$}")
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn text(area: &Area, value: &str, origin: (i32, i32), scale: i32, color: RGBColor) {
    for (x, y) in font::pixels(value, origin, scale) {
        for dx in 0..scale {
            for dy in 0..scale {
                // Drawing outside the picture is an error plotters reports; clipped text is
                // fine.
                let _ = area.draw_pixel((x + dx, y + dy), &color);
            }
        }
    }
}

/// Draws `panels` over a shared x axis from 0 into a PNG at `path`; `title` and `x_label` go
/// above and below.
pub fn draw(path: &Path, title: &str, x_label: &str, panels: &[Panel]) -> anyhow::Result<()> {
    let height = HEADER as u32 + PANEL_HEIGHT * panels.len() as u32 + 24;
    let root = BitMapBackend::new(path, (WIDTH, height)).into_drawing_area();
    let failed = |e: DrawingAreaErrorKind<_>| anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(failed)?;
    text(&root, title, (LEFT, 12), 2, TEXT);

    let x_max = panels
        .iter()
        .flat_map(|p| &p.lines)
        .flat_map(|l| &l.points)
        .map(|p| p.0)
        .fold(0.0, f64::max);
    let (x_end, x_step) = axis(x_max);

    for (index, panel) in panels.iter().enumerate() {
        let top = HEADER + index as i32 * PANEL_HEIGHT as i32;
        let (x0, x1) = (LEFT, WIDTH as i32 - RIGHT);
        let (y0, y1) = (top + PANEL_TOP, top + PANEL_HEIGHT as i32 - PANEL_BOTTOM);
        let y_max = panel
            .lines
            .iter()
            .flat_map(|l| &l.points)
            .map(|p| p.1)
            .fold(0.0, f64::max);
        let (y_end, y_step) = axis(y_max);
        let px = |x: f64| x0 + ((x / x_end) * f64::from(x1 - x0)).round() as i32;
        let py = |y: f64| y1 - ((y / y_end) * f64::from(y1 - y0)).round() as i32;

        // Grid and tick labels.
        let mut x = 0.0;
        while x <= x_end + x_step / 2.0 {
            root.draw(&PathElement::new(vec![(px(x), y0), (px(x), y1)], GRID))
                .map_err(failed)?;
            let label = tick_label(x, x_step);
            let left = px(x) - font::width(&label, 1) / 2;
            text(&root, &label, (left, y1 + 6), 1, TEXT);
            x += x_step;
        }
        let mut y = 0.0;
        while y <= y_end + y_step / 2.0 {
            root.draw(&PathElement::new(vec![(x0, py(y)), (x1, py(y))], GRID))
                .map_err(failed)?;
            let label = tick_label(y, y_step);
            let left = x0 - 6 - font::width(&label, 1);
            text(&root, &label, (left, py(y) - font::height(1) / 2), 1, TEXT);
            y += y_step;
        }
        root.draw(&Rectangle::new([(x0, y0), (x1, y1)], TEXT))
            .map_err(failed)?;

        // Title and legend; the legend wraps onto a second row.
        text(&root, &panel.title, (x0, top + 8), 2, TEXT);
        let legend_left = x0 + font::width(&panel.title, 2) + 24;
        let (mut left, mut row) = (legend_left, 0);
        for line in &panel.lines {
            let width = 24 + font::width(&line.label, 1) + 16;
            if left + width > x1 && left > legend_left {
                (left, row) = (legend_left, row + 1);
            }
            let middle = top + 6 + row * 12 + font::height(1) / 2;
            root.draw(&PathElement::new(
                vec![(left, middle), (left + 18, middle)],
                line.color.stroke_width(line.width.max(2)),
            ))
            .map_err(failed)?;
            text(&root, &line.label, (left + 24, top + 6 + row * 12), 1, TEXT);
            left += width;
        }

        // The series, then the round marks under the plot area.
        for line in &panel.lines {
            let points: Vec<(i32, i32)> =
                line.points.iter().map(|&(x, y)| (px(x), py(y))).collect();
            if line.bars {
                for &(x, y) in &points {
                    root.draw(&PathElement::new(
                        vec![(x, y1), (x, y)],
                        line.color.stroke_width(line.width),
                    ))
                    .map_err(failed)?;
                }
            } else if points.len() > 1 {
                root.draw(&PathElement::new(
                    points,
                    line.color.stroke_width(line.width),
                ))
                .map_err(failed)?;
            }
            for &mark in &line.marks {
                root.draw(&PathElement::new(
                    vec![(px(mark), y1 - 7), (px(mark), y1)],
                    line.color.stroke_width(2),
                ))
                .map_err(failed)?;
            }
        }
    }
    let bottom = height as i32 - 16;
    text(
        &root,
        x_label,
        ((WIDTH as i32 - font::width(x_label, 1)) / 2, bottom),
        1,
        TEXT,
    );
    root.present().map_err(failed)?;
    Ok(())
}
