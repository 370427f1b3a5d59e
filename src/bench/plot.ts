// SVG line plots for benchmark results, rendered headless with vega-lite -> vega (no browser).
import * as vega from 'vega';
import * as vl from 'vega-lite';

export interface LinePlot {
  title: string;
  xTitle: string;
  yTitle: string;
  /** One row per point: x, y and the series it belongs to. */
  points: { x: number; y: number; series: string; panel?: string }[];
}

/** Render a line plot (one line per series; one column per panel when panels are given). */
export async function renderLinePlotSvg(plot: LinePlot): Promise<string> {
  const hasPanels = plot.points.some((p) => p.panel !== undefined);
  const xValues = [...new Set(plot.points.map((p) => p.x))].sort((a, b) => a - b);
  const layer = {
    mark: { type: 'line' as const, point: true },
    encoding: {
      x: { field: 'x', type: 'quantitative' as const, title: plot.xTitle, scale: { type: 'log' as const, base: 2 }, axis: { values: xValues, format: 'd' } },
      y: { field: 'y', type: 'quantitative' as const, title: plot.yTitle },
      color: { field: 'series', type: 'nominal' as const, title: null },
    },
  };
  const spec: vl.TopLevelSpec = hasPanels
    ? {
        title: plot.title,
        data: { values: plot.points },
        facet: { column: { field: 'panel', type: 'nominal', title: null } },
        spec: { width: 320, height: 220, ...layer },
        resolve: { scale: { y: 'independent' } },
      }
    : { title: plot.title, data: { values: plot.points }, width: 420, height: 260, ...layer };
  const view = new vega.View(vega.parse(vl.compile(spec).spec), { renderer: 'none' });
  try {
    return await view.toSVG();
  } finally {
    view.finalize();
  }
}

export interface GroupedBarPlot {
  title: string;
  yTitle: string;
  /** One bar per (group, series); `faded` bars are drawn pale. */
  bars: { group: string; series: string; y: number; faded?: boolean }[];
}

/** Render grouped bars (a group per x category, a bar per series within it), y on a log scale. */
export async function renderGroupedBarSvg(plot: GroupedBarPlot): Promise<string> {
  const spec: vl.TopLevelSpec = {
    title: plot.title,
    data: { values: plot.bars.map((b) => ({ ...b, faded: b.faded ? 'yes' : 'no' })) },
    width: { step: 90 },
    height: 260,
    mark: { type: 'bar' },
    encoding: {
      x: { field: 'group', type: 'nominal', title: null, sort: null, axis: { labelAngle: 0 } },
      xOffset: { field: 'series', type: 'nominal', sort: null },
      y: { field: 'y', type: 'quantitative', title: plot.yTitle, scale: { type: 'log' } },
      color: { field: 'series', type: 'nominal', title: null, sort: null },
      opacity: { field: 'faded', type: 'ordinal', scale: { domain: ['no', 'yes'], range: [1, 0.3] }, legend: null },
    },
  };
  const view = new vega.View(vega.parse(vl.compile(spec).spec), { renderer: 'none' });
  try {
    return await view.toSVG();
  } finally {
    view.finalize();
  }
}
